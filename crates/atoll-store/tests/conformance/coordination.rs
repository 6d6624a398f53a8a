//! The coordination keyspace's cases: compare-and-swap, TTL leases, prefix
//! watches, the election, and fences on both keyspaces.

use std::time::Duration;

use atoll_model::{Kind, ResourceKey, decode_resource};
use atoll_store::{
    Change, CommitRequest, Coordination, Expect, KeyEvent, Store, StoreError, Write,
};
use futures::StreamExt;
use serde_json::json;

use crate::Backend;

/// etcd grants leases in whole seconds, at least 2 with its defaults.
const TTL: Duration = Duration::from_secs(2);

async fn next_event(
    watch: &mut futures::stream::BoxStream<'static, Result<KeyEvent, StoreError>>,
) -> KeyEvent {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event within 10 s")
        .expect("the watch goes on")
        .expect("no watch error")
}

fn commit_with(fence: Option<atoll_store::Fence>, name: &str) -> CommitRequest {
    let region = decode_resource(
        json!({"apiVersion": "atoll/v1", "kind": "Region", "metadata": {"name": name}}),
    )
    .expect("valid region");
    CommitRequest {
        changes: vec![Change::put(region)],
        base_revision: None,
        author: "leader".into(),
        message: None,
        fence,
    }
}

pub(crate) async fn keys_compare_and_swap(backend: &impl Backend) {
    let store = backend.open().await;
    assert_eq!(store.get_key("nodes/gw-1").await.expect("get"), None);
    let created = store
        .put_key(
            Write::put("nodes/gw-1", b"v1".to_vec()).expecting(Expect::Absent),
            None,
        )
        .await
        .expect("create");
    let entry = store
        .get_key("nodes/gw-1")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        (entry.value.as_slice(), entry.created, entry.modified),
        (&b"v1"[..], created, created)
    );
    let again = store
        .put_key(
            Write::put("nodes/gw-1", b"v2".to_vec()).expecting(Expect::Absent),
            None,
        )
        .await
        .expect_err("exists already");
    assert!(
        matches!(&again, StoreError::KeyConflict { key, .. } if key == "nodes/gw-1"),
        "{again}"
    );
    let updated = store
        .put_key(
            Write::put("nodes/gw-1", b"v2".to_vec()).expecting(Expect::Modified(created)),
            None,
        )
        .await
        .expect("swap");
    assert!(updated > created);
    let stale = store
        .put_key(
            Write::put("nodes/gw-1", b"v3".to_vec()).expecting(Expect::Modified(created)),
            None,
        )
        .await
        .expect_err("stale version");
    assert!(
        stale.to_string().contains("changed since it was read"),
        "{stale}"
    );
    let entry = store
        .get_key("nodes/gw-1")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(entry.value, b"v2", "a refused write changes nothing");
    assert_eq!(entry.created, created, "the create revision stays");

    // A batch is all or nothing.
    let refused = store
        .write_keys(
            vec![
                Write::put("nodes/gw-2", b"new".to_vec()),
                Write::put("nodes/gw-1", b"v4".to_vec()).expecting(Expect::Absent),
            ],
            None,
        )
        .await
        .expect_err("one write is refused");
    assert!(
        matches!(refused, StoreError::KeyConflict { .. }),
        "{refused}"
    );
    assert_eq!(store.get_key("nodes/gw-2").await.expect("get"), None);
    store
        .write_keys(
            vec![
                Write::put("nodes/gw-2", b"new".to_vec()),
                Write::put("nodes/gw-3", b"new".to_vec()),
                Write::put("other/x", b"x".to_vec()),
            ],
            None,
        )
        .await
        .expect("batch");
    let listing = store.list_keys("nodes/").await.expect("list");
    let keys: Vec<&str> = listing.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["nodes/gw-1", "nodes/gw-2", "nodes/gw-3"]);
    assert!(listing.revision >= updated);
    store
        .put_key(Write::delete("nodes/gw-3"), None)
        .await
        .expect("delete");
    assert_eq!(
        store.list_keys("nodes/").await.expect("list").entries.len(),
        2
    );
    let invalid = store
        .write_keys(
            vec![
                Write::put("a", b"1".to_vec()),
                Write::put("a", b"2".to_vec()),
            ],
            None,
        )
        .await
        .expect_err("a key twice");
    assert!(matches!(invalid, StoreError::Invalid(_)), "{invalid}");
    let empty = store.write_keys(vec![], None).await.expect_err("empty");
    assert!(matches!(empty, StoreError::Invalid(_)), "{empty}");
}

pub(crate) async fn a_prefix_watch_sees_changes_in_order(backend: &impl Backend) {
    let store = backend.open().await;
    store
        .put_key(Write::put("nodes/a", b"1".to_vec()), None)
        .await
        .expect("put");
    let listing = store.list_keys("nodes/").await.expect("list");
    let mut watch = store
        .watch_keys("nodes/", listing.revision)
        .await
        .expect("watch");
    store
        .put_key(Write::put("other/b", b"x".to_vec()), None)
        .await
        .expect("put elsewhere");
    let put = store
        .put_key(Write::put("nodes/b", b"2".to_vec()), None)
        .await
        .expect("put");
    store
        .put_key(Write::delete("nodes/a"), None)
        .await
        .expect("delete");
    match next_event(&mut watch).await {
        KeyEvent::Put(entry) => {
            assert_eq!((entry.key.as_str(), entry.modified), ("nodes/b", put));
            assert_eq!(entry.value, b"2");
        }
        other => panic!("expected the put of nodes/b, got {other:?}"),
    }
    match next_event(&mut watch).await {
        KeyEvent::Deleted { key, revision } => {
            assert_eq!(key, "nodes/a");
            assert!(revision > put);
        }
        other => panic!("expected the delete of nodes/a, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), watch.next())
            .await
            .is_err(),
        "other prefixes are not seen"
    );
}

pub(crate) async fn a_lease_keeps_its_keys_only_while_kept_alive(backend: &impl Backend) {
    let store = backend.open().await;
    let lease = store.grant(TTL).await.expect("grant");
    store
        .put_key(
            Write::put("replicas/r1", b"http://r1".to_vec()).with_lease(lease),
            None,
        )
        .await
        .expect("put under the lease");
    let listing = store.list_keys("replicas/").await.expect("list");
    assert_eq!(listing.entries[0].lease, Some(lease));
    let mut watch = store
        .watch_keys("replicas/", listing.revision)
        .await
        .expect("watch");
    // Kept alive past its TTL: the key stays.
    let until = tokio::time::Instant::now() + TTL + Duration::from_secs(1);
    while tokio::time::Instant::now() < until {
        let ttl = store.keep_alive(lease).await.expect("keep alive");
        assert!(ttl >= TTL, "{ttl:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(store.get_key("replicas/r1").await.expect("get").is_some());
    // Left alone: it runs out, its key is deleted and the watch sees it.
    let left = tokio::time::Instant::now();
    match next_event(&mut watch).await {
        KeyEvent::Deleted { key, .. } => assert_eq!(key, "replicas/r1"),
        other => panic!("expected the key to expire, got {other:?}"),
    }
    assert!(
        left.elapsed() >= TTL - Duration::from_millis(600),
        "{:?}",
        left.elapsed()
    );
    let expired = store.keep_alive(lease).await.expect_err("ran out");
    assert!(
        matches!(expired, StoreError::LeaseExpired(id) if id == lease),
        "{expired}"
    );
    let refused = store
        .put_key(
            Write::put("replicas/r1", b"x".to_vec()).with_lease(lease),
            None,
        )
        .await
        .expect_err("a put under an expired lease");
    assert!(matches!(refused, StoreError::LeaseExpired(_)), "{refused}");
    // Revoked: its keys go at once.
    let lease = store.grant(TTL).await.expect("grant");
    store
        .put_key(
            Write::put("replicas/r2", b"x".to_vec()).with_lease(lease),
            None,
        )
        .await
        .expect("put");
    store.revoke(lease).await.expect("revoke");
    assert_eq!(store.get_key("replicas/r2").await.expect("get"), None);
}

pub(crate) async fn one_leader_at_a_time_and_terms_grow(backend: &impl Backend) {
    let store = backend.open().await;
    assert!(
        store
            .leader("election/control")
            .await
            .expect("leader")
            .is_none()
    );
    let first_lease = store.grant(TTL).await.expect("grant");
    let first = store
        .campaign("election/control", b"http://r1".to_vec(), first_lease)
        .await
        .expect("the first campaigner leads");
    let leader = store
        .leader("election/control")
        .await
        .expect("leader")
        .expect("one");
    assert_eq!(
        (leader.value.as_slice(), &leader.fence),
        (&b"http://r1"[..], &first)
    );

    // A second campaigner waits while the first holds its lease.
    let second_lease = store.grant(TTL).await.expect("grant");
    let campaigner = store.clone();
    let mut second = tokio::spawn(async move {
        campaigner
            .campaign("election/control", b"http://r2".to_vec(), second_lease)
            .await
    });
    let waited = tokio::time::timeout(Duration::from_millis(700), &mut second).await;
    assert!(
        waited.is_err(),
        "a second leader while the first holds: {waited:?}"
    );
    // The leader's fenced writes land, in both keyspaces.
    store
        .commit(commit_with(Some(first.clone()), "hz"))
        .await
        .expect("a fenced commit of the leader");
    store
        .put_key(Write::put("config/x", b"1".to_vec()), Some(&first))
        .await
        .expect("a fenced key write of the leader");

    // The first leader's lease is revoked (it died): the second leads,
    // with a higher term.
    let keeper = store.clone();
    let keep_second = tokio::spawn(async move {
        loop {
            if keeper.keep_alive(second_lease).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    store.revoke(first_lease).await.expect("revoke");
    let fence = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second campaigner leads within 10 s")
        .expect("campaign task")
        .expect("campaign");
    assert!(fence.term > first.term, "{fence:?} after {first:?}");
    let leader = store
        .leader("election/control")
        .await
        .expect("leader")
        .expect("one");
    assert_eq!(leader.value, b"http://r2");

    // The deposed leader can change nothing, and is told so.
    let deposed = store
        .commit(commit_with(Some(first.clone()), "sh"))
        .await
        .expect_err("a commit of the deposed leader");
    assert!(
        matches!(deposed, StoreError::Fenced { term, .. } if term == first.term),
        "{deposed}"
    );
    assert!(
        store
            .get(&ResourceKey::new(Kind::Region, "sh"))
            .await
            .expect("get")
            .is_none(),
        "nothing of a fenced commit lands"
    );
    let deposed = store
        .put_key(Write::put("config/x", b"2".to_vec()), Some(&first))
        .await
        .expect_err("a key write of the deposed leader");
    assert!(matches!(deposed, StoreError::Fenced { .. }), "{deposed}");
    assert_eq!(
        store
            .get_key("config/x")
            .await
            .expect("get")
            .expect("kept")
            .value,
        b"1"
    );
    store
        .commit(commit_with(Some(fence.clone()), "sh"))
        .await
        .expect("the new leader commits");
    // Resigning ends the term at once.
    store.resign(&fence).await.expect("resign");
    assert!(
        store
            .leader("election/control")
            .await
            .expect("leader")
            .is_none()
    );
    let after = store
        .commit(commit_with(Some(fence), "bj"))
        .await
        .expect_err("a commit after resigning");
    assert!(matches!(after, StoreError::Fenced { .. }), "{after}");
    keep_second.abort();
}

/// Keys without a lease (tokens, the audit chain) are kept as etcd keeps
/// them: after the store is opened again they are there with their
/// revisions, a compare-and-swap on them still works, and new revisions
/// are above the old ones. Keys under a lease go with the lease.
pub(crate) async fn keys_without_a_lease_survive_reopening(backend: &impl Backend) {
    let (created, leased_key) = {
        let store = backend.open().await;
        let lease = store.grant(TTL).await.expect("grant");
        let created = store
            .write_keys(
                vec![
                    Write::put("tokens/a", b"kept".to_vec()).expecting(Expect::Absent),
                    Write::put("tokens/b", b"gone soon".to_vec()),
                    Write::put("nodes/leased", b"lease".to_vec()).with_lease(lease),
                ],
                None,
            )
            .await
            .expect("write");
        store
            .put_key(Write::delete("tokens/b"), None)
            .await
            .expect("delete");
        store.revoke(lease).await.expect("revoke");
        (created, "nodes/leased")
    };
    let store = backend.open().await;
    let kept = store
        .get_key("tokens/a")
        .await
        .expect("get")
        .expect("a key without a lease is kept");
    assert_eq!(
        (
            kept.value.as_slice(),
            kept.created,
            kept.modified,
            kept.lease
        ),
        (&b"kept"[..], created, created, None)
    );
    assert_eq!(store.get_key("tokens/b").await.expect("get"), None);
    assert_eq!(store.get_key(leased_key).await.expect("get"), None);
    let next = store
        .put_key(
            Write::put("tokens/a", b"swapped".to_vec()).expecting(Expect::Modified(created)),
            None,
        )
        .await
        .expect("compare-and-swap on a restored key");
    assert!(next > created, "{next} > {created}");
}
