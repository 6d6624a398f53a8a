use atoll_api::registry::Instance;
use atoll_store::{Entry, KeyEvent};
use prost::Message;

use super::*;

fn instance(service: &str, zone: &str, name: &str) -> Instance {
    Instance {
        service: service.into(),
        name: name.into(),
        zone: zone.into(),
        cell: "rz01".into(),
        region: "hz".into(),
        address: "10.0.0.1".into(),
        port: 8080,
        protocol: "http".into(),
        weight: 100,
        ..Instance::default()
    }
}

fn put(instance: &Instance, revision: i64) -> KeyEvent {
    KeyEvent::Put(entry(instance, revision))
}

fn entry(instance: &Instance, revision: i64) -> Entry {
    Entry {
        key: crate::keys::instance_key("default", instance),
        value: instance.encode_to_vec(),
        created: revision,
        modified: revision,
        lease: None,
    }
}

/// The next updates of `sub`, whole (no parts).
async fn next(sub: &Subscription) -> Vec<Update> {
    sub.next()
        .await
        .into_iter()
        .flat_map(|p| p.into_updates(usize::MAX))
        .collect()
}

fn bank() -> ServiceKey {
    ServiceKey::new("default", "bank")
}

#[tokio::test]
async fn a_subscriber_gets_a_snapshot_then_only_what_changed() {
    let hub = Hub::new();
    let a = instance("bank", "hz-a", "a");
    hub.reset(&[entry(&a, 1)], 1);
    let sub = hub.subscribe();
    sub.add(bank());
    let first = next(&sub).await;
    assert_eq!(first.len(), 1);
    assert!(first[0].snapshot);
    assert_eq!(first[0].instances, vec![a.clone()]);

    let b = instance("bank", "hz-a", "b");
    hub.apply(&put(&b, 2));
    let second = next(&sub).await;
    assert!(!second[0].snapshot);
    assert_eq!(second[0].instances, vec![b]);
    assert_eq!(second[0].revision, 2);

    hub.apply(&KeyEvent::Deleted {
        key: crate::keys::instance_key("default", &a),
        revision: 3,
    });
    let third = next(&sub).await;
    assert!(third[0].instances.is_empty());
    assert_eq!(third[0].removed.len(), 1);
    assert_eq!(third[0].removed[0].name, "a");
    assert_eq!(hub.counts().instances, 1);
}

#[tokio::test]
async fn a_subscriber_is_sent_nothing_about_services_it_does_not_call() {
    let hub = Hub::new();
    hub.reset(&[], 0);
    let sub = hub.subscribe();
    sub.add(bank());
    assert!(next(&sub).await[0].snapshot);
    hub.apply(&put(&instance("risk", "hz-a", "r"), 2));
    assert!(sub.take_updates(usize::MAX).is_empty());
    // Another workspace's service of the same name is another service.
    let mut other = instance("bank", "hz-a", "x");
    other.name = "x".into();
    hub.apply(&KeyEvent::Put(Entry {
        key: crate::keys::instance_key("payments", &other),
        ..entry(&other, 3)
    }));
    assert!(sub.take_updates(usize::MAX).is_empty());
}

#[tokio::test]
async fn a_slow_subscriber_gets_the_latest_state_once_not_every_step() {
    let hub = Hub::new();
    hub.reset(&[], 0);
    let sub = hub.subscribe();
    sub.add(bank());
    next(&sub).await;
    let mut a = instance("bank", "hz-a", "a");
    for revision in 1..=100 {
        a.weight = u32::try_from(revision).expect("small");
        hub.apply(&put(&a, revision));
    }
    let updates = sub.take_updates(usize::MAX);
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].instances.len(), 1);
    assert_eq!(updates[0].instances[0].weight, 100);
    assert_eq!(updates[0].revision, 100);
}

#[tokio::test]
async fn nothing_is_sent_before_the_registry_was_listed() {
    let hub = Hub::new();
    let sub = hub.subscribe();
    sub.add(bank());
    let waiting = tokio::time::timeout(std::time::Duration::from_millis(100), sub.next()).await;
    assert!(
        waiting.is_err(),
        "a snapshot before the listing would say `no instances`"
    );
    hub.reset(&[entry(&instance("bank", "hz-a", "a"), 5)], 5);
    let updates = next(&sub).await;
    assert_eq!(updates[0].instances.len(), 1);
}

#[tokio::test]
async fn a_listing_again_sends_only_what_differs() {
    let hub = Hub::new();
    let a = instance("bank", "hz-a", "a");
    let b = instance("bank", "hz-a", "b");
    hub.reset(&[entry(&a, 1), entry(&b, 2)], 2);
    let sub = hub.subscribe();
    sub.add(bank());
    next(&sub).await;
    let mut b2 = b.clone();
    b2.port = 9090;
    let c = instance("bank", "hz-b", "c");
    hub.reset(&[entry(&a, 1), entry(&b2, 7), entry(&c, 8)], 8);
    let updates = sub.take_updates(usize::MAX);
    assert_eq!(updates.len(), 1);
    let names: Vec<&str> = updates[0]
        .instances
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(names, ["b", "c"]);
    hub.reset(&[entry(&c, 8)], 9);
    let updates = sub.take_updates(usize::MAX);
    let removed: Vec<&str> = updates[0].removed.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(removed, ["a", "b"]);
}

/// The bytes a change costs a subscriber grow with the change, not with
/// the registry: one instance changed among 10,000 (across 1,000
/// subscribers of its service) is one instance on each wire.
#[tokio::test]
async fn bytes_per_change_grow_with_the_change_not_the_registry() {
    let hub = Hub::new();
    let entries: Vec<Entry> = (0..10_000)
        .map(|i| {
            entry(
                &instance("bank", &format!("z{}", i % 10), &format!("i{i}")),
                1,
            )
        })
        .collect();
    hub.reset(&entries, 1);
    let subs: Vec<Subscription> = (0..1_000).map(|_| hub.subscribe()).collect();
    for sub in &subs {
        sub.add(bank());
    }
    let snapshot = Subscription::wire_bytes(&next(&subs[0]).await);
    for sub in &subs[1..] {
        sub.take_updates(usize::MAX);
    }
    let mut changed = instance("bank", "z3", "i3");
    changed.port = 9;
    hub.apply(&put(&changed, 2));
    let mut delta = 0;
    for sub in &subs {
        let updates = sub.take_updates(usize::MAX);
        assert_eq!(updates[0].instances.len(), 1);
        delta = delta.max(Subscription::wire_bytes(&updates));
    }
    let one = changed.encoded_len();
    assert!(
        delta < one + 32,
        "a one-instance delta took {delta} bytes (instance {one})"
    );
    assert!(snapshot > 10_000 * one / 2, "snapshot {snapshot} bytes");
}

#[tokio::test]
async fn removing_a_service_or_dropping_a_subscriber_stops_its_updates() {
    let hub = Hub::new();
    hub.reset(&[], 0);
    let sub = hub.subscribe();
    sub.add(bank());
    next(&sub).await;
    sub.remove(&bank());
    hub.apply(&put(&instance("bank", "hz-a", "a"), 1));
    assert!(sub.take_updates(usize::MAX).is_empty());
    let other = hub.subscribe();
    other.add(ServiceKey::new("default", "risk"));
    drop(other);
    // The service entry of a dropped watcher with no instances is gone.
    assert_eq!(hub.counts().services, 1);
}

#[tokio::test]
async fn a_large_snapshot_is_sent_in_parts_applied_together() {
    let hub = Hub::new();
    let entries: Vec<Entry> = (0..1_201)
        .map(|i| entry(&instance("bank", "hz-a", &format!("i{i:04}")), 1))
        .collect();
    hub.reset(&entries, 1);
    let sub = hub.subscribe();
    sub.add(bank());
    let parts: Vec<Update> = sub
        .next()
        .await
        .into_iter()
        .flat_map(|p| p.into_updates(crate::UPDATE_PART))
        .collect();
    let sizes: Vec<usize> = parts.iter().map(|u| u.instances.len()).collect();
    assert_eq!(sizes, [500, 500, 201]);
    let flags: Vec<(bool, bool)> = parts.iter().map(|u| (u.snapshot, u.more)).collect();
    assert_eq!(flags, [(true, true), (false, true), (false, false)]);
    // An empty service's snapshot is one update that says so.
    let empty = hub.subscribe();
    empty.add(ServiceKey::new("default", "risk"));
    let parts: Vec<Update> = empty
        .next()
        .await
        .into_iter()
        .flat_map(|p| p.into_updates(crate::UPDATE_PART))
        .collect();
    assert_eq!(parts.len(), 1);
    assert!(parts[0].snapshot && !parts[0].more && parts[0].instances.is_empty());
}
